"""Serializers of the pilots API (read only). A pilot's token hash is never shown."""

from rest_framework import serializers

from pilots.models import Pilot


class PilotSerializer(serializers.ModelSerializer):
    """A pilot (the seed's PILOT_DAT row) as users and operators see it.

    Mapping to the seed's columns: ``id`` is PILOT_DAT.pilot_id and ``status`` is its free-text
    status line; ``state`` is the pilot's state machine. The token hash is never exposed.
    """

    class Meta:
        model = Pilot
        fields = [
            "id",
            "hostname",
            "site",
            "device_type",
            "state",
            "status",
            "cores",
            "memory_mb",
            "gpus",
            "slots",
            "version",
            "started_at",
            "last_heartbeat",
            "metrics",
            "token_revoked_at",
            "created_at",
            "updated_at",
            "state_changed_at",
        ]
        read_only_fields = fields
