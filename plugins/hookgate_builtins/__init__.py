"""The built-in plugins, each loaded through its entry point like any third-party plugin."""
