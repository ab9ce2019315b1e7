"""OpenAPI description of the pilots' authentication (drf-spectacular extension)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class PilotTokenScheme(OpenApiAuthenticationExtension):
    target_class = "pilots.auth.PilotTokenAuthentication"
    name = "pilotToken"

    def get_security_requirement(self, auto_schema):
        # A pilot's token is recognised everywhere (to answer 403 on user endpoints), but it
        # is the way in only for the pilot protocol's endpoints.
        from pilots.auth import IsPilot

        if IsPilot in getattr(auto_schema.view, "permission_classes", ()):
            return {self.name: []}
        return None

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "A pilot's own token, returned by its registration: "
            "`Authorization: Pilot <token>`.",
        }
