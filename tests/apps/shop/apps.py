"""The shop app's configuration."""

from __future__ import annotations

from django.apps import AppConfig


class ShopConfig(AppConfig):
    """The test shop (label ``shop``)."""

    name = "tests.apps.shop"
    label = "shop"
    default_auto_field = "django.db.models.AutoField"
