"""videorelay: a relay from still images to stored MP4 clips via hiapi."""

__version__ = "0.1.0"
