"""EndpointPickerConfig: the plugin registry, loading and validation, defaults, reload state."""
