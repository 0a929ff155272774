"""Sluice endpoint picker: chooses the model-server endpoint for each inference request."""
