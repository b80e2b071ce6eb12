"""The built-in offline tasks: ``exact``, ``sentiment`` (the default) and ``hh``."""
