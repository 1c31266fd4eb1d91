"""Jinja2 templates of the units unitgen renders (package data of unitgen.units)."""
