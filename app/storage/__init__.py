"""Where finished clips live."""

from app.storage.local import LocalStorage

__all__ = ["LocalStorage"]
