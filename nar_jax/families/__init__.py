"""Search-space families: how a config's ``model`` becomes a space, networks and counts.

A :class:`Family` is a NamedTuple of pure functions (in :class:`nar_jax.policy.Policy`'s
manner): everything the phases need to know about a kind of network, and nothing about
the task or the run. Three are built in and registered when this package is imported:

* ``resnet`` (:mod:`nar_jax.families.resnet`): basic-block ResNets (ResNet-18 and
  relatives), operators searched at conv or block granularity;
* ``ir`` (:mod:`nar_jax.families.ir`): ArcFace's LResNet-E-IR face networks;
* ``enas_macro`` (:mod:`nar_jax.families.macro`): ENAS's macro space, operators and
  skips searched jointly (NAS-Arch, the alternating search).

A network of your own is one more family: build its space from
:class:`nar_jax.space.Node` s, write its Flax module with
:func:`nar_jax.models.nodes.choice_node` where the searchable layers go, and
:func:`register` the family (README, "Refining your own network";
``examples/own_network.py``). :func:`family_for` is the only place that reads
``config.model.base``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import types
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from nar_jax import controller, counting, ops
from nar_jax import policy as policy_lib
from nar_jax.models import nodes
from nar_jax.models.heads import Head
from nar_jax.policy import Policy

Space = Any
"""A search space: :class:`nar_jax.space.SearchSpace`, :class:`nar_jax.joint.JointSpace`,
or any object with ``name``, ``num_nodes``, ``candidate_mask()``, ``baseline()``,
``validate(arch)`` and ``names(arch)``."""


class NetworkArgs(NamedTuple):
  """What a family's networks are built with besides the space and the architecture.

  Attributes:
    num_classes: classifier outputs.
    head: the output head (the task's choice: :class:`nar_jax.models.heads.Head`).
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    choice: the supernet's operator choice, ``'switch'`` or ``'select'``.
    bn_axis_name: mesh axis of synchronised BatchNorm, or ``None``.
  """

  num_classes: int
  head: Head = Head()
  dtype: Any = None
  choice: str = 'switch'
  bn_axis_name: str | None = None


class CountArgs(NamedTuple):
  """The inputs and outputs counts are taken at.

  Attributes:
    image_hw: input height and width.
    in_channels: input image channels.
    num_classes: classifier outputs; 0 leaves the classifier out (face networks are
      counted without it, as ArcFace and the paper do).
    head: the output head (a ``'face'`` head counts its embedding layer).
  """

  image_hw: tuple[int, int]
  in_channels: int
  num_classes: int
  head: Head = Head()


class Family(NamedTuple):
  """A search-space family.

  Attributes:
    name: the family's name (``report.json`` and logs do not depend on it).
    bases: the ``config.model.base`` values it builds.
    heads: the output heads its networks can have (``('face',)``: face networks only).
    space: ``config -> space``, the search space of ``config.model``.
    network: ``(space, arch, NetworkArgs) -> nn.Module``: the supernet for
      ``arch=None`` (called as ``model.apply(variables, images, arch, train=...)``), the
      fixed network of the validated ``arch`` otherwise (called without ``arch``).
    counts: ``(space, arch, CountArgs) -> ops.Counts``, parameters and MACs of the
      fixed network ``arch``; equal to its initialised parameter count.
    macs_model: ``(space, CountArgs) -> (arch -> MACs)``, a jittable count for traced
      architectures (the cost-aware reward).
    policy: ``(space, controller config, search) -> Policy``, the controller over the
      space (``search``: ``'joint'``, ``'operators'`` or ``'skips'``; operator-only
      families accept the first two).
    used_mask: ``space -> (tree, arch) -> bool tree``, which supernet leaves ``arch`` uses.
    node_names: ``space -> [str]``, one readable name per decision of ``report.md``.
    parse_arch: ``(space, entries) -> arch``, the comma-separated form of ``config.arch``
      (``entries``: the stripped strings between the commas) as a validated architecture.
    searches: the ``config.search.method`` values it supports.
    retrain_space: ``(config, space) -> space``, the space of the retrained fixed
      networks (the search space, unless the family retrains at another size).
    node_text: a readable architecture's entry (``space.names(arch)[i]``) on one line.
    arch_separator: what joins the entries of an architecture on one line.
    arch_legend: a sentence under ``report.md``'s architecture table, or ``''``.
    check_config: ``config -> None``; raises ``ValueError`` naming a field the family
      cannot work with.
    space_size: ``space -> int``, how many architectures the space has.
    sample_uniform: ``space -> (key -> arch)``, a jittable draw uniform over the space
      (the search evaluation's random architectures).
  """

  name: str
  bases: tuple[str, ...]
  heads: tuple[str, ...]
  space: Callable[[ml_collections.ConfigDict], Space]
  network: Callable[[Space, tuple[int, ...] | None, NetworkArgs], nn.Module]
  counts: Callable[[Space, Sequence[Any], CountArgs], ops.Counts]
  macs_model: Callable[[Space, CountArgs], Callable[[Any], Any]]
  policy: Callable[[Space, ml_collections.ConfigDict, str], Policy]
  used_mask: Callable[[Space], Callable[[Any, Any], Any]]
  node_names: Callable[[Space], list[str]]
  parse_arch: Callable[[Space, list[str]], tuple[int, ...]]
  searches: tuple[str, ...] = ('controller', 'random')
  retrain_space: Callable[[ml_collections.ConfigDict, Space], Space] = (
      lambda config, space: space)
  node_text: Callable[[Any], str] = str
  arch_separator: str = ','
  arch_legend: str = ''
  check_config: Callable[[ml_collections.ConfigDict], None] = lambda config: None
  space_size: Callable[[Space], int] = lambda space: operator_space_size(space)
  sample_uniform: Callable[[Space], Callable[[Any], Any]] = (
      lambda space: operator_uniform_sampler(space))


def operator_space_size(space: Space) -> int:
  """The product of each decision's candidate count."""
  return math.prod(int(n) for n in space.candidate_mask().sum(axis=1))


def operator_uniform_sampler(space: Space) -> Callable[[Any], Any]:
  """``key -> (num_nodes,) int32``: each node's op uniform over its candidates."""
  mask = jnp.asarray(space.candidate_mask())
  return lambda key: controller.uniform_sample(key, mask)


# ---------------------------------------------------------------------------------------
# Operator spaces: a fixed skeleton whose nodes each take one operator (NAR's spaces).
# ---------------------------------------------------------------------------------------


def operator_policy(space: Space, c: ml_collections.ConfigDict, search: str = 'operators'
                    ) -> Policy:
  """NAR's controller over the nodes of an operator space
  (:func:`nar_jax.policy.operator_policy`), with the refinement prior of
  ``c.original_prob`` (:func:`nar_jax.controller.original_prior`)."""
  if search not in ('joint', 'operators'):
    raise ValueError(f'an operator space searches operators only, not {search!r}')
  mask = space.candidate_mask()
  prior = (controller.original_prior(mask, space.baseline(), c.original_prob)
           if c.original_prob > 0 else None)
  return policy_lib.operator_policy(mask, c.tanh_constant, c.hidden, c.init_range, c.kind, prior)


def additive_macs_model(counts: Callable[[Space, Sequence[Any], CountArgs], ops.Counts]
                        ) -> Callable[[Space, CountArgs], Callable[[Any], Any]]:
  """:attr:`Family.macs_model` of an operator space from its exact ``counts``
  (:func:`nar_jax.counting.additive_macs_model`)."""
  return lambda space, a: counting.additive_macs_model(
      lambda arch: counts(space, arch, a).macs, space.baseline(), space.candidate_mask())


def operator_family(name: str, bases: Sequence[str], heads: Sequence[str],
                    space: Callable[[ml_collections.ConfigDict], Space],
                    network: Callable[[Space, tuple[int, ...] | None, NetworkArgs], nn.Module],
                    counts: Callable[[Space, Sequence[Any], CountArgs], ops.Counts],
                    **overrides: Any) -> Family:
  """A family over an operator space (:class:`nar_jax.space.NodeSpace` or
  :class:`nar_jax.space.SearchSpace`: one operator per node, skips fixed) whose network
  names node ``i``'s variables ``node{i:02d}/<op>`` (:func:`nar_jax.models.nodes.choice_node`).

  Fills the rest: NAR's operator controller (:func:`operator_policy`), MACs additive in
  the nodes' operators (:func:`additive_macs_model`), the node-scoped branch mask
  (:func:`nar_jax.models.nodes.branch_mask`), the nodes' names, and ``config.arch`` as
  comma-separated op names. ``overrides`` replace any of them (:class:`Family` fields).
  """
  fields = dict(
      name=name, bases=tuple(bases), heads=tuple(heads), space=space, network=network,
      counts=counts, macs_model=additive_macs_model(counts), policy=operator_policy,
      used_mask=lambda space: nodes.branch_mask,
      node_names=lambda space: [n.name for n in space.nodes],
      parse_arch=lambda space, entries: space.validate(entries))
  fields.update(overrides)
  return Family(**fields)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Makes ``family`` the builder of each of its ``bases``; returns it.

  Registering a base twice replaces the earlier family (re-running a notebook cell).
  """
  for base in family.bases:
    _REGISTRY[base] = family
  return family


def bases_searching_with(method: str) -> list[str]:
  """The registered bases whose family supports ``config.search.method=method``."""
  return sorted(base for base, family in _REGISTRY.items() if method in family.searches)


def import_family_module(spec: str) -> types.ModuleType:
  """Imports (once) and returns ``spec``, a Python file (``.py``, ``~`` expanded) or a
  module name, whose import registers a family (``config.model.family_module``)."""
  if not spec.endswith('.py'):
    return importlib.import_module(spec)
  path = os.path.abspath(os.path.expanduser(spec))
  if not os.path.exists(path):
    raise ValueError(f'config.model.family_module names {path}, which does not exist')
  name = 'nar_jax_family_' + ''.join(ch if ch.isalnum() else '_' for ch in path)
  if name not in sys.modules:
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # Flax modules defined in it look their module up here.
    module_spec.loader.exec_module(module)
  return sys.modules[name]


def family_for(config: ml_collections.ConfigDict) -> Family:
  """The family that builds ``config.model.base``.

  ``config.model.family_module`` (a ``.py`` path or a module name; optional) is imported
  first when the base is not registered yet: that is how a family of your own is found
  again by later commands that only read the workdir's ``config.json``.
  """
  base = config.model.base
  module = config.model.get('family_module', '')
  if base not in _REGISTRY and module:
    import_family_module(module)
  if base not in _REGISTRY:
    raise ValueError(f'config.model.base={base!r} is not a registered network; known: '
                     f'{", ".join(repr(b) for b in _REGISTRY)} (a network of your own: '
                     'register its family, README "Refining your own network")')
  return _REGISTRY[base]


def build_space(config: ml_collections.ConfigDict) -> Space:
  """The search space of ``config`` (its family's :attr:`Family.space`)."""
  return family_for(config).space(config)


def network_head(family: Family, config: ml_collections.ConfigDict) -> str:
  """The output head kind of ``config``'s networks: ``config.model.head``, or the only
  head the family's networks have."""
  return family.heads[0] if len(family.heads) == 1 else config.model.head


def arch_text(family: Family, readable: Sequence[Any]) -> str:
  """A readable architecture (``space.names(arch)``) on one line."""
  return family.arch_separator.join(family.node_text(entry) for entry in readable)


def restricted_ops(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The op names of ``config.model.ops``, or ``None`` when it restricts nothing."""
  allowed = tuple(op.strip() for op in config.model.ops.split(',') if op.strip())
  return allowed or None


from nar_jax.families import ir, macro, resnet  # noqa: E402  (registers the built-in families)

__all__ = ['CountArgs', 'Family', 'NetworkArgs', 'Space', 'additive_macs_model',
           'arch_text', 'bases_searching_with', 'build_space', 'family_for',
           'import_family_module', 'ir', 'macro', 'network_head', 'operator_family',
           'operator_policy', 'operator_space_size', 'operator_uniform_sampler',
           'register', 'resnet', 'restricted_ops']
