"""The WMS pilot: the agent that runs on worker nodes, takes jobs from RabbitMQ and runs them.

Django-free on purpose (DESIGN.md section 2): it imports only the Django-free ``wms.contract``,
``wms.topology`` and ``wms.checksums``, plus kombu, requests and psutil. See docs/pilot.md (for
site admins) and docs/pilot-api.md (the protocol).
"""

__version__ = "0.1.0"
