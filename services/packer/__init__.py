"""PackerService: writes the requested formats, atomically, with a manifest."""
