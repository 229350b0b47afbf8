"""Built-in plugins. Each is loaded through the `hookgate` entry-point group like any other."""
