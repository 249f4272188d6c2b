"""The ``enas_macro`` family: ENAS's macro space, operators and skips searched jointly.

Space :func:`nar_jax.joint.joint_space` (``model.num_layers`` layers of
``model.channels``; retrained at ``model.retrain_channels`` / ``model.retrain_widen``),
network :class:`nar_jax.models.macro.MacroNet`, ENAS's joint controller
(:func:`nar_jax.policy.joint_policy`; the alternating search forces one half).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from nar_jax import counting, joint, ops
from nar_jax import families
from nar_jax import policy as policy_lib
from nar_jax.joint import JointSpace, joint_space
from nar_jax.models import macro
from nar_jax.models.macro import MacroNet


def count_architecture(space: JointSpace, arch: Sequence[Any], image_hw: tuple[int, int],
                             in_channels: int, num_classes: int,
                             embedding_size: int | None = None) -> ops.Counts:
  """Counts of the fixed ENAS macro network of joint ``arch`` (:class:`nar_jax.models.macro.MacroNet`).

  Stem conv3x3 + BN; per layer of ``c`` channels a branch ``1x1 conv + BN``, then the
  operator (``c -> c``, stride 1), and for layers after the first the post-skip BN
  (skip additions cost nothing here); at each pool layer one factorized reduction
  (two 1x1 convs to ``c' / 2`` on the stride-2 grid, BN) per output the architecture
  still reads (:func:`nar_jax.joint.needed_reductions`); the dense head, or the face
  head (:func:`nar_jax.counting.count_face_head`) on the last layer's output.

  Args:
    space: the joint space; ``arch``: flat or readable joint architecture (validated).
    image_hw, in_channels, num_classes: the input and the classifier's outputs (0: none).
    embedding_size: the face head's embedding features (``head='face'``); ``None``
      for the softmax head.
  """
  _, skips = joint.split(np.asarray(space.validate(arch)), space.num_layers)
  ops_ = [entry['op'] for entry in space.names(arch)]
  needed = joint.needed_reductions(skips, space.pool_layers)
  reductions = joint_reduction_counts(space, image_hw)
  hw = tuple(image_hw)
  channels = space.stage_channels(0)
  total = ops.count_conv(ops.ConvLayer(3, in_channels, channels), hw) + ops.count_bn(channels)
  for j, op in enumerate(ops_):
    last_hw, last_channels = hw, channels  # the head reads the last layer's output
    total += ops.count_conv(ops.ConvLayer(1, channels, channels), hw) + ops.count_bn(channels)
    total += ops.count_op(op, channels, channels, 1, hw)[0]
    if j > 0:
      total += ops.count_bn(channels)
    if j in space.pool_layers:
      k = space.pool_layers.index(j)
      for _ in range(int(np.sum(needed[k]))):
        total += reductions[k]
      hw = tuple(-(-s // 2) for s in hw)
      channels = space.stage_channels(k + 1)
  return total + counting.count_output(last_hw, last_channels, num_classes, embedding_size)


def joint_reduction_counts(space: JointSpace, image_hw: tuple[int, int]) -> list[ops.Counts]:
  """Counts of one factorized reduction at each pool layer of ``space`` (two 1x1 convs
  to half the next stage's channels on the stride-2 grid, then BN)."""
  hw, channels, counts = tuple(image_hw), space.stage_channels(0), []
  for k, _ in enumerate(space.pool_layers):
    out = space.stage_channels(k + 1)
    hw = tuple(-(-s // 2) for s in hw)
    half = ops.count_conv(ops.ConvLayer(1, channels, out // 2), hw)
    counts.append(half + half + ops.count_bn(out))
    channels = out
  return counts


def macs_model(space: JointSpace, a: families.CountArgs):
  """A jittable ``flat arch -> MACs`` of the fixed networks of ``space``: the operators'
  additive table (:func:`nar_jax.counting.additive_macs_model`) plus each factorized
  reduction the architecture needs (:func:`nar_jax.joint.needed_reductions`)."""
  embedding = a.head.embedding_size if a.head.kind == 'face' else None
  macs = lambda arch: count_architecture(space, arch, a.image_hw, a.in_channels, a.num_classes,
                                         embedding).macs
  reduction_macs = np.array([c.macs for c in joint_reduction_counts(space, a.image_hw)],
                            np.float64)
  needed_count = lambda arch: joint.needed_reductions(
      joint.split(arch, space.num_layers)[1], space.pool_layers).sum(-1)
  baseline = np.asarray(space.baseline())
  reductions_of_baseline = float(np.dot(reduction_macs, needed_count(baseline)))
  op_macs = counting.additive_macs_model(macs, baseline, space.candidate_mask(),
                                         space.op_positions())

  def joint_macs(arch):
    arch = jnp.asarray(arch)
    return (op_macs(arch) - reductions_of_baseline
            + jnp.dot(jnp.asarray(reduction_macs, jnp.float32),
                      needed_count(arch).astype(jnp.float32)))

  return joint_macs


def num_layers(arch: Sequence[Any]) -> int:
  """The layers of a joint architecture in readable (a dict per layer) or flat form."""
  if arch and isinstance(arch[0], dict):
    return len(arch)
  return joint.num_layers_of(len(arch))


def node_text(entry: dict[str, Any]) -> str:
  """A readable layer ``{'op', 'skips'}`` as ``op <- stem + layer1`` (the op alone
  without skips)."""
  return entry['op'] + (' <- ' + ' + '.join(entry['skips']) if entry['skips'] else '')


def _space(config: ml_collections.ConfigDict) -> JointSpace:
  m = config.model
  return joint_space(m.num_layers, m.channels, candidates=families.restricted_ops(config))


def _retrain_space(config: ml_collections.ConfigDict, space: JointSpace) -> JointSpace:
  m = config.model
  return dataclasses.replace(space, channels=m.retrain_channels or m.channels,
                             widen=m.retrain_widen)


def _network(space: JointSpace, arch, args: families.NetworkArgs) -> MacroNet:
  return MacroNet(space, args.num_classes, arch=arch, dtype=args.dtype,
                  bn_axis_name=args.bn_axis_name, choice=args.choice, head=args.head.kind,
                  margin=args.head.margin, embedding_size=args.head.embedding_size)


def _counts(space: JointSpace, arch, a: families.CountArgs) -> ops.Counts:
  embedding = a.head.embedding_size if a.head.kind == 'face' else None
  return count_architecture(space, arch, a.image_hw, a.in_channels, a.num_classes, embedding)


def _policy(space: JointSpace, c: ml_collections.ConfigDict, search: str = 'joint'):
  return policy_lib.joint_policy(space, c.tanh_constant, c.hidden, c.init_range, c.skip_target,
                                 c.skip_weight, search, controller_kind=c.kind)


def _parse_arch(space: JointSpace, entries: list[str]) -> tuple[int, ...]:
  if not all(e.lstrip('-').isdigit() for e in entries):
    raise ValueError(f'config.arch for the joint space must be an arch.json path, JSON, or '
                     f'the flat vector as comma-separated integers; got {",".join(entries)!r}')
  return space.validate([int(e) for e in entries])


def _check_config(config: ml_collections.ConfigDict) -> None:
  m = config.model
  for name in ('num_layers', 'channels'):
    if m[name] <= 0:
      raise ValueError(f'config.model.{name} must be positive, got {m[name]}')
  if m.retrain_channels < 0:
    raise ValueError(f'config.model.retrain_channels must be >= 0 (0: model.channels), '
                     f'got {m.retrain_channels}')
  if config.search.controller.original_prob > 0:
    raise ValueError('config.search.controller.original_prob applies to operator searches; '
                     "the joint space ('enas_macro') starts uniform: set it to 0")


FAMILY = families.register(families.Family(
    name='enas_macro',
    bases=('enas_macro',),
    heads=('softmax', 'face'),
    searches=('controller', 'random', 'alternating'),
    space=_space,
    retrain_space=_retrain_space,
    network=_network,
    counts=_counts,
    macs_model=macs_model,
    policy=_policy,
    used_mask=lambda space: lambda tree, arch: macro.branch_mask(tree, arch, space),
    node_names=lambda space: [f'layer{j}' for j in range(space.num_layers)],
    parse_arch=_parse_arch,
    node_text=node_text,
    arch_separator='; ',
    arch_legend=("Joint architectures: each layer's operator, then (after `<-`) the earlier "
                 "outputs added to it by skip connections (`stem` is the stem's output, "
                 "`layer{t}` layer t's)."),
    check_config=_check_config,
    space_size=lambda space: (families.operator_space_size(space)
                              * 2 ** len(space.skip_positions())),
    sample_uniform=lambda space: policy_lib.joint_policy(space).uniform,
))
