"""The model whose changes the tests invalidate."""

from __future__ import annotations

from django.db import models


class Product(models.Model):
    """A product with a price."""

    name = models.CharField(max_length=100)
    price = models.IntegerField()

    class Meta:
        app_label = "shop"

    def as_dict(self) -> dict[str, object]:
        """The product as JSON."""
        return {"id": self.pk, "name": self.name, "price": self.price}
