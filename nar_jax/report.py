"""The final report: baseline vs refined network, as ``report.json`` and ``report.md``.

Every figure is measured by the run: parameters and MACs are counted from the op
definitions, accuracies come from evaluation, times from the clock.
"""

from __future__ import annotations

import json
import os
from typing import Any

from nar_jax import families


def _change(new: float | None, old: float | None) -> float | None:
  """Relative change in percent, ``100 (new - old) / old``."""
  if new is None or old is None or old == 0:
    return None
  return 100.0 * (new - old) / old


def build(nets, arch: tuple[int, ...], derived: dict | None, refined: dict,
          baseline: dict | None) -> dict[str, Any]:
  """Assembles the report dict of the networks ``nets``
  (:class:`nar_jax.phases.context.Networks`).

  ``valid_acc`` is the architecture's accuracy on the validation split with the
  searched shared weights (the score derive ranks architectures by); it is ``None``
  when no search ran (``config.arch`` given). ``test_acc`` is the retrained
  network's accuracy on the test split (``None`` for a baseline not retrained);
  ``test_top5`` its top-5 accuracy where the task measures it (ImageNet), else ``None``.
  """
  base_arch = nets.space.baseline()

  def entry(a, retrained, valid_acc):
    counts = nets.counts(a)
    retrained = retrained or {}
    return {'arch': nets.space.names(a), 'params': counts.params, 'macs': counts.macs,
            'valid_acc': valid_acc, 'test_acc': retrained.get('test_acc'),
            'test_top5': retrained.get('test_top5'),
            'verification': retrained.get('verification', {}),
            'retrain_step_s': retrained.get('step_s')}

  result = {
      'dataset': nets.config.dataset.name,
      'space': nets.space.name,
      'width': nets.config.model.width,
      'nodes': nets.node_names,
      'baseline': entry(base_arch, baseline,
                        derived['baseline']['valid_acc'] if derived else None),
      'refined': entry(arch, refined, derived['best']['valid_acc'] if derived else None),
  }
  result['change_percent'] = {
      k: _change(result['refined'][k], result['baseline'][k])
      for k in ('params', 'macs', 'test_acc')}
  if derived:
    result['search'] = {
        'seconds': derived['search_seconds'],
        'supernet_step_s': derived['supernet_step_s'],
        'candidates': derived['candidates'],
    }
    if 'alternating' in derived:
      result['alternating'] = derived['alternating']
    if derived.get('search_curve'):
      result['search']['curve'] = derived['search_curve']
      result['search']['uniform_entropy'] = derived['uniform_entropy']
    if nets.cost is not None:
      result['search']['cost'] = {
          'target_macs': nets.cost.target_macs, 'weight': nets.cost.weight,
          'weight_below': nets.cost.weight_below,
          'refined_macs_over_target': result['refined']['macs'] / nets.cost.target_macs,
          'baseline_macs_over_target': result['baseline']['macs'] / nets.cost.target_macs}
    fixed = result['refined']['retrain_step_s']
    if derived['supernet_step_s'] and fixed:
      result['search']['supernet_over_fixed_step'] = derived['supernet_step_s'] / fixed
  return result


def _fmt(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def markdown(result: dict[str, Any], family: families.Family) -> str:
  """``report.md``: the comparison table and both architectures (written as ``family``
  prints them)."""
  b, r, ch = result['baseline'], result['refined'], result['change_percent']
  lines = [
      f'# NAR report: {result["space"]} (width {result["width"]}) on {result["dataset"]}',
      '',
      '| | baseline | refined | change |',
      '| --- | ---: | ---: | ---: |',
      f'| parameters | {b["params"]:,} | {r["params"]:,} | {_fmt(ch["params"], "+.2f")}% |',
      f'| MACs | {b["macs"]:,} | {r["macs"]:,} | {_fmt(ch["macs"], "+.2f")}% |',
      f'| valid acc (shared weights) | {_fmt(b["valid_acc"], ".4f")} | '
      f'{_fmt(r["valid_acc"], ".4f")} | |',
      *([f'| test acc (retrained) | {_fmt(b["test_acc"], ".4f")} | {_fmt(r["test_acc"], ".4f")} | '
         f'{_fmt(ch["test_acc"], "+.2f")}% |'] if r['test_acc'] is not None else []),
      *([f'| test top-5 (retrained) | {_fmt(b["test_top5"], ".4f")} | '
         f'{_fmt(r["test_top5"], ".4f")} | |'] if r.get('test_top5') is not None else []),
      f'| retrain s/step | {_fmt(b["retrain_step_s"], ".4f")} | '
      f'{_fmt(r["retrain_step_s"], ".4f")} | |',
      '',
      '## Architectures',
      '',
      '| node | baseline | refined |',
      '| --- | --- | --- |',
  ]
  names = list(r['verification']) or list(b['verification'])
  if names:
    lines[lines.index('## Architectures'):lines.index('## Architectures')] = [
        '## Verification (retrained)',
        '',
        'insightface protocol: flip-sum embeddings, squared L2 distance, 10 folds. Accuracy '
        'mean +- std over folds; TAR at FAR 1e-3.',
        '',
        '| pair set | baseline accuracy | refined accuracy | baseline TAR | refined TAR |',
        '| --- | ---: | ---: | ---: | ---: |',
        *[_verification_row(name, b['verification'].get(name), r['verification'].get(name))
          for name in names],
        '',
    ]
  for node, op_b, op_r in zip(result['nodes'], b['arch'], r['arch']):
    text_b, text_r = family.node_text(op_b), family.node_text(op_r)
    lines.append(f'| {node} | {text_b} | {text_r if op_r == op_b else f"**{text_r}**"} |')
  if family.arch_legend:
    lines += ['', family.arch_legend]
  if 'alternating' in result:
    lines += _alternating_lines(result['alternating'], family)
  if 'search' in result:
    s = result['search']
    lines += [
        '',
        '## Search',
        '',
        f'Search (pretrain + search + derive) took {s["seconds"]:.1f} s; supernet step '
        f'{_fmt(s["supernet_step_s"], ".4f")} s'
        + (f' ({s["supernet_over_fixed_step"]:.2f}x the refined fixed network\'s step).'
           if 'supernet_over_fixed_step' in s else '.'),
        '',
    ]
    if 'cost' in s:
      cost = s['cost']
      lines += [f'Cost-aware reward: accuracy x (MACs / {cost["target_macs"]:,.0f}) ^ w, '
                f'w = {cost["weight"]} above the target, {cost["weight_below"]} below; '
                f'the refined network has {cost["refined_macs_over_target"]:.2f}x '
                f'the target MACs, the baseline {cost["baseline_macs_over_target"]:.2f}x.', '']
    if 'curve' in s:
      lines += _curve_lines(s['curve'], s['uniform_entropy'])
    lines += ['| candidate | valid acc (shared weights) | MACs | score | log-prob |',
              '| --- | ---: | ---: | ---: | ---: |']
    lines += [f'| {c["source"]} | {c["valid_acc"]:.4f} | {_fmt(c.get("macs"), ",")} | '
              f'{_fmt(c.get("score"), ".4f")} | {c["log_prob"]:.2f} |'
              for c in s['candidates']]
  return '\n'.join(lines) + '\n'


def _curve_lines(curve: list[dict[str, Any]], uniform_entropy: float) -> list[str]:
  """The search's learning curve, one row per epoch (:func:`nar_jax.phases.search.epoch_summary`)."""
  lines = ['Learning during the search: the shared weights\' training accuracy on the '
           'architectures they were trained with, the mean validation accuracy (shared '
           "weights) of the controller's samples, and the controller's entropy (the sum over "
           f'nodes; {uniform_entropy:.2f} is uniform) and mean sampled MACs at the end of each '
           'epoch.', '',
           '| epoch | train acc (shared weights) | valid acc of samples | entropy | '
           '% of uniform | sampled MACs |',
           '| ---: | ---: | ---: | ---: | ---: | ---: |']
  for row in curve:
    share = None if row['entropy'] is None else 100 * row['entropy'] / uniform_entropy
    lines.append(f'| {row["epoch"]} | {row["train_acc"]:.4f} | {_fmt(row["valid_acc"], ".4f")} | '
                 f'{_fmt(row["entropy"], ".2f")} | {_fmt(share, ".1f")} | '
                 f'{_fmt(row["macs"], ",.0f")} |')
  return lines + ['']


def _alternating_lines(alt: dict[str, Any], family: families.Family) -> list[str]:
  """The alternating search's expected-reward sequence (:mod:`nar_jax.alternating`)."""
  lines = ['', '## Alternating search (eq. 9-11)', '',
           f'Stopped: {alt["stopped"]}. ER of a phase = validation accuracy (shared weights) of '
           'the architecture it keeps; the incumbent is always a candidate.', '',
           '| step | phase | round | ER | incumbent before | improved | architecture kept |',
           '| ---: | --- | ---: | ---: | ---: | --- | --- |']
  for i, h in enumerate(alt['history']):
    lines.append(f'| {i + 1} | {h["phase"]} | {h["round"]} | {h["er"]:.4f} | '
                 f'{h["incumbent_reward"]:.4f} | {"yes" if h["improved"] else "no"} | '
                 f'{families.arch_text(family, h["arch"])} |')
  return lines


def _verification_row(name: str, base: dict | None, refined: dict | None) -> str:
  def acc(r):
    return '-' if r is None else f'{r["accuracy"]:.4f} +- {r["accuracy_std"]:.4f}'

  def tar(r):
    return '-' if r is None else f'{r["tar"]:.4f}'

  return f'| {name} | {acc(base)} | {acc(refined)} | {tar(base)} | {tar(refined)} |'


def write(workdir: str, result: dict[str, Any], family: families.Family) -> None:
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(markdown(result, family))
