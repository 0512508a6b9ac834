"""Outbound changes: the event outbox, live updates (SSE), the webhook and FHIR Tasks."""
