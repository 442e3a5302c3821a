"""Kept for tools that call setup.py; pyproject.toml holds the configuration."""

from setuptools import setup

setup()
