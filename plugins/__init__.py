"""The built-in algorithm plugins (installed as ``rlhf_zoo_plugins``), one module per algorithm."""
