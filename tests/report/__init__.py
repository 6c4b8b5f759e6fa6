"""Tests of the HTML report of `epochlens report`, rendered in headless Chromium."""
