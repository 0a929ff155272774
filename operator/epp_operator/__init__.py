"""Sluice operator: turns cluster objects into the picker's datastore inputs."""
