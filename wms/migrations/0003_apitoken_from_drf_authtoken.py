"""Users' tokens of DRF's ``rest_framework.authtoken`` (kept in clear in ``authtoken_token``)
move into ``ApiToken``, hashed: each key keeps working, and the table of clear keys is dropped
with the app's migration records (the app left INSTALLED_APPS). On a database that never had
the app, nothing happens. There is no way back: the keys are not kept."""

import hashlib

from django.db import migrations

LEGACY_TABLE = "authtoken_token"
LEGACY_PREFIX = 6  # characters of an old key shown to recognise it (of 40 hex digits)


def move_drf_tokens(apps, schema_editor):
    connection = schema_editor.connection
    if LEGACY_TABLE not in connection.introspection.table_names():
        return
    ApiToken = apps.get_model("wms", "ApiToken")
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        columns = ", ".join(qn(c) for c in ("key", "user_id", "created"))
        cursor.execute(f"SELECT {columns} FROM {qn(LEGACY_TABLE)}")  # noqa: S608
        rows = cursor.fetchall()
    ApiToken.objects.bulk_create(
        [
            ApiToken(
                user_id=user_id,
                name="DRF token (migrated)",
                prefix=key[:LEGACY_PREFIX],
                key_hash=hashlib.sha256(key.encode()).hexdigest(),
                created_at=created,
            )
            for key, user_id, created in rows
        ]
    )
    schema_editor.execute(f"DROP TABLE {qn(LEGACY_TABLE)}")
    schema_editor.execute("DELETE FROM django_migrations WHERE app = %s", ["authtoken"])


class Migration(migrations.Migration):
    dependencies = [("wms", "0002_apitoken")]

    operations = [migrations.RunPython(move_drf_tokens, migrations.RunPython.noop)]
