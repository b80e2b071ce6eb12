"""Gymnasium environments for text generation and the built-in offline tasks.

Installed as ``rlhf_zoo_envs``. The environment ids are registered by ``import rlhf_zoo``.
"""
