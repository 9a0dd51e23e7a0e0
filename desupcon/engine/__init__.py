"""How runs train: the device policy, building a run, the training step and the loop."""
