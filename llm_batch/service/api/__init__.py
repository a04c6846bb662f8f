"""The REST API: routers and the dependencies they share."""
