"""The API, one router per resource, all under /api."""
