"""Scheduling: profiles of filters, weighted scorers and a picker, chosen by a profile handler."""
