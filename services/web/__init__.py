"""The web service: a JSON API and live pages over the QueryService (issue 9)."""
