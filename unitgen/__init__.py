"""unitgen: one systemd-supervised instance of a Python web app per core."""

__version__ = "0.1.0"
