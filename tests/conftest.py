"""Shared pytest setup: four fake CPU devices for the data-parallel tests."""

import chex

chex.set_n_cpu_devices(4)
