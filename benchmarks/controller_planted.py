"""Planted-target controller searches: how fast does each controller variant learn?

The reward is the fraction of nodes whose op equals a planted target (a per-node
random target, and an all-same one); the search runs through
``train.make_policy_update`` with the policy built as the pipeline builds it
(``nar_jax.planted``). For each (space, target, variant, lr, samples per update)
and controller setting (variant, Adam lr, EMA baseline decay) it reports the median
over seeds of the updates until the greedy decode matches >= 90% of the nodes
(checked every 5; '>B' when the median seed did not within the budget B), and the
medians of the final entropy (nats, summed over nodes) and the final greedy match.
Other settings: ENAS's (``config.enas_controller()``: Adam beta1 0, eps 1e-3, tanh
constant 1.5, entropy weight 1e-4).

  PYTHONPATH=. python benchmarks/controller_planted.py         # the README table
  PYTHONPATH=. python benchmarks/controller_planted.py --spaces=resnet18 \
      --settings=node_aware:0.02:0.9 --samples=10 --budget=80
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from nar_jax import config as config_lib
from nar_jax import joint, planted, policy, space, train


def spaces() -> dict[str, tuple[str, np.ndarray]]:
  """``name -> (policy kind, candidate mask)``: the quickstart's ResNet-18-16 space
  (16 nodes x 5 ops) and ENAS's 12-layer macro space (6 ops)."""
  return {
      'resnet18': ('operators', space.resnet_space('resnet18', 'conv', 0.125,
                                                   'paper').candidate_mask()),
      'enas_macro': ('joint', joint.joint_space(12, 36).candidate_mask()),
  }


def measure(space_name: str, target_name: str, kind: str, lr: float, baseline_decay: float,
            num_aggregate: int, budget: int, seeds: int) -> dict:
  """One table row: median updates to 90% and final entropy over ``seeds`` seeds."""
  policy_kind, mask = spaces()[space_name]
  c = config_lib.search_controller(config_lib.enas_controller())
  c.kind, c.lr, c.baseline_decay, c.num_aggregate = kind, lr, baseline_decay, num_aggregate
  if policy_kind == 'joint':
    pol = policy.joint_policy(joint.joint_space(mask.shape[0], 36), c.tanh_constant, c.hidden,
                              c.init_range, c.skip_target, c.skip_weight, controller_kind=kind)
  else:
    pol = policy.operator_policy(mask, c.tanh_constant, c.hidden, c.init_range, kind)
  results = []
  for seed in range(seeds):
    target = (planted.random_target(mask, seed) if target_name == 'random'
              else planted.uniform_target(mask))
    results.append(planted.planted_search(
        pol, train.controller_optimizer(c), target, budget=budget,
        num_aggregate=num_aggregate, entropy_weight=c.entropy_weight,
        baseline_decay=c.baseline_decay, seed=seed))
  updates = sorted(budget + 1 if r.updates is None else r.updates for r in results)
  median = updates[len(updates) // 2]
  return dict(space=space_name, target=target_name, kind=kind, lr=lr,
              baseline_decay=baseline_decay, samples=num_aggregate,
              updates=f'>{budget}' if median > budget else str(median),
              entropy=float(np.median([r.entropy for r in results])),
              match=float(np.median([r.match for r in results])))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--spaces', default='resnet18,enas_macro')
  parser.add_argument('--targets', default='random,same')
  parser.add_argument('--settings', help='comma-separated kind:lr:baseline_decay',
                      default='enas:0.001:0.99,enas:0.01:0.99,node_aware:0.01:0.9,'
                              'node_aware:0.02:0.9,node_aware:0.05:0.9')
  parser.add_argument('--samples', default='10,20')
  parser.add_argument('--budget', type=int, default=100)
  parser.add_argument('--seeds', type=int, default=3)
  a = parser.parse_args()
  train.add_cpu_xla_flags()
  split = lambda s: [x for x in s.split(',') if x]
  print('| space | target | variant | lr | baseline decay | samples/update '
        '| updates to 90% (median) | final entropy | final match |')
  print('|---|---|---|---|---|---|---|---|---|')
  for sp, tg, setting, m in itertools.product(split(a.spaces), split(a.targets),
                                              split(a.settings), split(a.samples)):
    kind, lr, decay = setting.split(':')
    r = measure(sp, tg, kind, float(lr), float(decay), int(m), a.budget, a.seeds)
    print(f"| {r['space']} | {r['target']} | {r['kind']} | {r['lr']:g} "
          f"| {r['baseline_decay']:g} | {r['samples']} | {r['updates']} "
          f"| {r['entropy']:.2f} | {r['match']:.2f} |", flush=True)


if __name__ == '__main__':
  main()
