"""A one-model Django app for the integration tests."""
