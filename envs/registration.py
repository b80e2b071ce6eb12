"""Gymnasium ids of the text-generation environments.

    gymnasium.make("rlhf_zoo/TokenGen-v0", task="exact")                  # one token per step
    gymnasium.make_vec("rlhf_zoo/TokenGen-v0", num_envs=64, task="exact")  # TokenGenVectorEnv (batched)
    gymnasium.make("rlhf_zoo/ResponseGen-v0", task="exact")               # one response per step
    gymnasium.make("rlhf_zoo/TokenGen-v0", model="path/or/hub-id", reward=fn, prompts=["..."])  # your model

``make_vec`` uses the ``vector_entry_point``: one batched environment, not N copies.
"""

from __future__ import annotations

import gymnasium

#: id -> (entry_point, vector_entry_point)
ENV_IDS: dict[str, tuple[str, str]] = {
    "rlhf_zoo/TokenGen-v0": ("rlhf_zoo_envs.token_gen:TokenGenEnv", "rlhf_zoo_envs.token_gen:TokenGenVectorEnv"),
    "rlhf_zoo/ResponseGen-v0": (
        "rlhf_zoo_envs.response_gen:ResponseGenEnv",
        "rlhf_zoo_envs.response_gen:ResponseGenVectorEnv",
    ),
}


def register_envs() -> None:
    """Register the environment ids with gymnasium; ids already registered are left as they are."""
    for env_id, (entry_point, vector_entry_point) in ENV_IDS.items():
        if env_id in gymnasium.registry:
            continue
        gymnasium.register(id=env_id, entry_point=entry_point, vector_entry_point=vector_entry_point,
                           max_episode_steps=None)
