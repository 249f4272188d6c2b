"""Search-quality evaluation of a finished run:
``python -m nar_jax.evaluate --workdir=RUN --num_random=K``.

Does the search find something that random architectures of its space do not? The
evaluation takes ``K`` random architectures of the run's space (uniform over each
node's candidates, the policy's ``uniform``; deterministic from the run's seed;
distinct; neither the baseline nor the refined one), the baseline and the refined
architecture (``arch.json``), and measures for each

* its validation accuracy with the search's final shared weights (the whole
  validation split, as derive scores candidates), and
* its accuracy after retraining from scratch with the run's retrain recipe
  (:func:`nar_jax.phases.retrain.run`; test accuracy, or for face networks the
  verification accuracy on the config's first pair set).

From them it reports Kendall's tau between the two (does the shared-weight score
rank architectures as retraining does?), the refined network's percentile among the
random architectures (all of them, and those with at most its MACs), and the
accuracy-vs-MACs plot with the Pareto front of the measured architectures.

Outputs under ``RUN/evaluation/``: ``evaluation.md``, ``evaluation.json``,
``evaluation.png``, and the cached measurements (``shared_scores.json``,
``retrain_random_<i>.json``); the random retrains checkpoint as
``RUN/checkpoints/retrain_random_<i>/``. Running the command again continues an
interrupted evaluation; on a finished one it measures nothing and rewrites the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Sequence

import jax
import matplotlib
import ml_collections
import numpy as np
import scipy.stats
from absl import app, flags, logging
from ml_collections import config_flags

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from nar_jax import distributed, families, files, pipeline, train  # noqa: E402
from nar_jax import workdir as workdir_lib  # noqa: E402
from nar_jax.data import DatasetNotPreparedError  # noqa: E402
from nar_jax.phases import loop, retrain, supernet  # noqa: E402
from nar_jax.phases.context import Context, Networks  # noqa: E402
from nar_jax.progress import Progress  # noqa: E402

EVALUATION_DIR = 'evaluation'


# ---------------------------------------------------------------------------------------
# The run: its config, its finished state, its shared weights.
# ---------------------------------------------------------------------------------------


def load_run_config(workdir: str,
                    config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The config a run ran with: ``<workdir>/config.json`` (written by
  :func:`nar_jax.pipeline.setup`), or ``config`` for a run that predates it.

  Raises:
    ValueError: no ``config.json`` and no ``config``, or a ``config`` that differs from
      the run's ``config.json``.
  """
  path = os.path.join(workdir, pipeline.CONFIG_FILE)
  if not os.path.exists(path):
    if config is None:
      raise ValueError(f'{path} does not exist: the run predates config.json (or {workdir} is '
                       f'not a run); pass --config=<the run\'s config file> with the overrides '
                       f'it ran with')
    return config
  stored = workdir_lib.read_config(workdir)  # with the fields the schema gained since
  if config is not None and config.to_dict() != stored.to_dict():
    raise ValueError(f'--config differs from the run\'s {path}; leave --config out to use the '
                     f'run\'s own config')
  return stored


def _check_finished(workdir: str) -> None:
  """Raises ValueError unless ``workdir`` is a finished run that searched."""
  if not os.path.exists(os.path.join(workdir, 'report.json')):
    raise ValueError(f'{workdir} has no report.json: finish the run first (run '
                     f'python -m nar_jax.main with the same --config and --workdir)')
  if not os.path.exists(os.path.join(workdir, 'results', 'derive.json')):
    raise ValueError(f'{workdir} ran no search (config.arch was given): there are no shared '
                     f'weights to evaluate')


def _search_phase(ctx: Context) -> str:
  """The phase whose checkpoint holds the search's final shared weights."""
  return 'alternating' if ctx.config.search.method == 'alternating' else 'search'


def restore_shared_weights(ctx: Context, nets: Networks) -> Any:
  """The supernet variables of the search's last checkpoint (``checkpoints/search``, or
  ``checkpoints/alternating``), restored into the structure the search saved."""
  phase = _search_phase(ctx)
  directory = os.path.join(ctx.workdir, 'checkpoints', phase)
  if not os.path.isdir(directory):
    raise ValueError(f'{directory} does not exist: the run kept no search checkpoint')
  c = ctx.config.search.controller
  child = supernet.initial_state(ctx, nets, supernet.child_optimizer(ctx, nets))
  policy = nets.policy('operators') if phase == 'alternating' else nets.policy()
  ctrl = train.controller_state(policy.init(ctx.key('controller')),
                                train.controller_optimizer(c))
  like = {'child': child, 'controller': train.replicate(ctx.mesh, ctrl)}
  state, _ = loop.restore_latest(ctx, phase, like)
  return state['child'].variables


# ---------------------------------------------------------------------------------------
# Random architectures.
# ---------------------------------------------------------------------------------------


def random_architectures(ctx: Context, nets: Networks, num_random: int,
                         exclude: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
  """``num_random`` distinct architectures, each node's op uniform over its candidates
  (joint: the policy's ``uniform``, each skip bit a fair coin), none in ``exclude``.

  Draw ``d`` uses the key ``fold_in(key('evaluate_random'), d)``; repeats and excluded
  draws are skipped. So the list is a function of the run's seed, and the first ``k``
  architectures for ``num_random = K`` are those for ``num_random = k``.
  """
  available = nets.family.space_size(nets.space) - len(set(exclude))
  if num_random > available:
    raise ValueError(f'--num_random={num_random} exceeds the {available} architectures of the '
                     f'space {nets.space.name} besides the baseline and the refined one')
  # Uniform over the space even when the search started near the base network
  # (search.controller.original_prob): the control is the space, not the search's prior.
  uniform = jax.jit(nets.family.sample_uniform(nets.space))
  key = ctx.key('evaluate_random')
  seen, found = set(exclude), []
  draw = 0
  while len(found) < num_random:
    arch = nets.space.validate(np.asarray(jax.device_get(uniform(jax.random.fold_in(key, draw)))))
    draw += 1
    if arch not in seen:
      seen.add(arch)
      found.append(arch)
  return found


# ---------------------------------------------------------------------------------------
# Measurements, cached in <workdir>/evaluation/.
# ---------------------------------------------------------------------------------------


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _arch_key(arch: tuple[int, ...]) -> str:
  return ','.join(str(a) for a in arch)


def shared_scores(ctx: Context, nets: Networks, archs: list[tuple[int, ...]]) -> list[float]:
  """Validation accuracy of each of ``archs`` with the search's final shared weights
  (:func:`nar_jax.phases.supernet.valid_accuracy`).

  Cached by architecture in ``evaluation/shared_scores.json``; the weights are
  restored and the eval step built only when an architecture is not cached.
  """
  path = os.path.join(ctx.workdir, EVALUATION_DIR, 'shared_scores.json')
  cached = _read_json(path) if os.path.exists(path) else {}
  missing = [a for a in archs if _arch_key(a) not in cached]
  if missing:
    variables = restore_shared_weights(ctx, nets)
    eval_fn = supernet.eval_step(ctx, nets)
    for i, arch in enumerate(missing):
      cached[_arch_key(arch)] = supernet.valid_accuracy(ctx, nets, eval_fn, variables, arch)
      ctx.log.info(f'[evaluate] shared weights {i + 1}/{len(missing)}: valid acc '
                   f'{cached[_arch_key(arch)]:.4f} {nets.arch_text(arch)}')
    if distributed.is_main_process():
      files.write_json(path, cached)
  return [cached[_arch_key(a)] for a in archs]


def _retrained(ctx: Context, nets: Networks, name: str, arch: tuple[int, ...]) -> dict[str, Any]:
  """The pipeline's retrain result of its ``baseline`` or ``refined`` network; a
  baseline the run did not retrain (``retrain.baseline=False``) is retrained now and
  recorded as the pipeline's own ``retrain_baseline`` phase."""
  phase = f'retrain_{name}'
  result = ctx.results.load(phase)
  if result is None:
    if name != 'baseline':
      raise ValueError(f'{ctx.results.path(phase)} does not exist: the run is not finished')
    ctx.log.info('[evaluate] the run did not retrain its baseline: retraining it now')
    result = retrain.run(ctx, nets, name, arch)
    ctx.results.save(phase, result)
  return result


def retrain_random(ctx: Context, nets: Networks, archs: list[tuple[int, ...]]) -> list[dict]:
  """:func:`nar_jax.phases.retrain.run` of each random architecture as phase
  ``retrain_random_<i>`` (its own RNG key, checkpoints and cached result
  ``evaluation/retrain_random_<i>.json``); returns their results in order."""
  results = []
  paths = [os.path.join(ctx.workdir, EVALUATION_DIR, f'retrain_random_{i:02d}.json')
           for i in range(len(archs))]
  done = sum(os.path.exists(p) for p in paths)
  progress = Progress(ctx.log, 'evaluate', len(archs), done)
  for i, (arch, path) in enumerate(zip(archs, paths)):
    if os.path.exists(path):
      cached = _read_json(path)
      if tuple(cached['op_indices']) != arch:
        raise ValueError(f'{path} holds {cached["op_indices"]}, not the random architecture '
                         f'{list(arch)} this run draws: was the run\'s config changed?')
      results.append(cached['retrained'])
      continue
    ctx.log.info(f'[evaluate] retraining random architecture {i + 1}/{len(archs)}: '
                 f'{nets.arch_text(arch)}')
    retrained = retrain.run(ctx, nets, f'random_{i:02d}', arch)
    if distributed.is_main_process():
      files.write_json(path, {'op_indices': list(arch), 'retrained': retrained})
    results.append(retrained)
    progress.update(1, f'random architecture {i + 1}/{len(archs)} retrained: '
                    f'accuracy {nets.task.headline_value(ctx.config, retrained):.4f}')
  return results


# ---------------------------------------------------------------------------------------
# Statistics (pure functions of the measured rows).
# ---------------------------------------------------------------------------------------


def percentile(value: float, population: Sequence[float]) -> float | None:
  """``100 * |{p in population : p <= value}| / |population|``: 100 means no member of
  the population is more accurate than ``value``. ``None`` for an empty population."""
  if not len(population):
    return None
  return 100.0 * float(np.mean(np.asarray(population, np.float64) <= value))


def kendall_tau(valid_acc: Sequence[float], accuracy: Sequence[float]) -> dict[str, float | None]:
  """``scipy.stats.kendalltau`` (tau-b) of two equally long score lists: ``tau`` and
  its two-sided ``p_value``; both ``None`` where undefined (fewer than 2 entries, or
  a constant list)."""
  if len(valid_acc) < 2:
    return {'tau': None, 'p_value': None}
  tau, p_value = scipy.stats.kendalltau(valid_acc, accuracy)
  defined = lambda x: None if np.isnan(x) else float(x)
  return {'tau': defined(tau), 'p_value': defined(p_value)}


def pareto_front(macs: Sequence[int], accuracy: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """The best accuracy for at most each cost: ``(x, y)``, ``x`` the sorted distinct MACs,
  ``y[i]`` the maximum accuracy of the architectures with at most ``x[i]`` MACs."""
  macs = np.asarray(macs, np.int64)
  accuracy = np.asarray(accuracy, np.float64)
  x = np.unique(macs)
  y = np.array([accuracy[macs <= m].max() for m in x])
  return x, y


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Kendall's tau over the distinct architectures of ``rows``, and the refined row's
  percentile and the median accuracy of the random rows (all, and those with at most
  the refined network's MACs). Rows: ``source`` (``'baseline'``, ``'refined'``,
  ``'random_<i>'``), ``op_indices``, ``macs``, ``valid_acc``, ``accuracy``."""
  distinct, seen = [], set()
  for r in rows:
    if tuple(r['op_indices']) not in seen:
      seen.add(tuple(r['op_indices']))
      distinct.append(r)
  refined = next(r for r in rows if r['source'] == 'refined')
  random_rows = [r for r in rows if r['source'].startswith('random_')]
  cheaper = [r for r in random_rows if r['macs'] <= refined['macs']]

  def group(members):
    accuracy = [r['accuracy'] for r in members]
    return {'count': len(members), 'percentile': percentile(refined['accuracy'], accuracy),
            'median_accuracy': float(np.median(accuracy)) if accuracy else None}

  return {'kendall': {**kendall_tau([r['valid_acc'] for r in distinct],
                                    [r['accuracy'] for r in distinct]),
                      'num_architectures': len(distinct)},
          'refined_accuracy': refined['accuracy'], 'refined_macs': refined['macs'],
          'random': group(random_rows), 'random_at_most_refined_macs': group(cheaper)}


# ---------------------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------------------


def plot(rows: list[dict[str, Any]], metric: str, path: str) -> None:
  """Accuracy against MACs: random architectures, baseline, refined (labelled), and the
  Pareto front of all of them as a step line."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  random_rows = [r for r in rows if r['source'].startswith('random_')]
  ax.scatter([r['macs'] for r in random_rows], [r['accuracy'] for r in random_rows], s=25,
             color='0.55', marker='o', label=f'random ({len(random_rows)})', zorder=2)
  x, y = pareto_front([r['macs'] for r in rows], [r['accuracy'] for r in rows])
  ax.step(x, y, where='post', color='tab:green', linewidth=1, label='Pareto front', zorder=1)
  for source, marker, color, size in (('baseline', 's', 'tab:blue', 60),
                                      ('refined', '*', 'tab:red', 160)):
    r = next(r for r in rows if r['source'] == source)
    ax.scatter([r['macs']], [r['accuracy']], s=size, marker=marker, color=color, label=source,
               zorder=3)
    ax.annotate(source, (r['macs'], r['accuracy']), textcoords='offset points', xytext=(6, 6))
  ax.set_xlabel('MACs')
  ax.set_ylabel(f'{metric} (retrained)')
  ax.set_title('Retrained accuracy vs MACs')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _fmt(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def _group_text(group: dict[str, Any]) -> str:
  if not group['count']:
    return 'none of the random architectures has at most its MACs'
  return (f'{_fmt(group["percentile"], ".1f")}% (median of the {group["count"]}: '
          f'{group["median_accuracy"]:.4f})')


def markdown(result: dict[str, Any], family: families.Family) -> str:
  """``evaluation.md``: the summary, how to read it, and every architecture."""
  s, k, metric = result['summary'], result['summary']['kendall'], result['metric']
  tau = ('undefined (a constant score list)' if k['tau'] is None
         else f'{k["tau"]:.3f} (p = {k["p_value"]:.3g})')
  lines = [
      f'# Search evaluation: {result["space"]} on {result["dataset"]}',
      '',
      f'{result["num_random"]} random architectures of the space (each node\'s op uniform over '
      f'its candidates; distinct; neither the baseline nor the refined one), the baseline and '
      f'the refined architecture. Each is scored on the whole validation split with the '
      f'search\'s final shared weights and retrained from scratch with the run\'s retrain '
      f'recipe. Accuracy: the retrained network\'s {metric}.',
      '',
      '| measure | value |',
      '| --- | ---: |',
      f'| Kendall\'s tau, shared-weight valid acc vs retrained accuracy '
      f'({k["num_architectures"]} architectures) | {tau} |',
      f'| refined network: {metric} | {s["refined_accuracy"]:.4f} |',
      f'| refined network: MACs | {s["refined_macs"]:,} |',
      f'| refined percentile among the {s["random"]["count"]} random architectures | '
      f'{_group_text(s["random"])} |',
      f'| refined percentile among the random architectures with at most its MACs | '
      f'{_group_text(s["random_at_most_refined_macs"])} |',
      '',
      'Percentile: 100 x the fraction of the group\'s random architectures whose retrained '
      'accuracy is at most the refined network\'s (100%: none is more accurate). Kendall\'s '
      'tau (tau-b, scipy.stats.kendalltau, two-sided p-value) over the distinct architectures '
      'below: 1 means the shared weights rank the architectures as retraining does, 0 no '
      'agreement.',
      '',
      '## Architectures',
      '',
      f'| source | architecture | params | MACs | valid acc (shared weights) | '
      f'{metric} (retrained) |',
      '| --- | --- | ---: | ---: | ---: | ---: |',
  ]
  lines += [f'| {r["source"]} | {families.arch_text(family, r["arch"])} | {r["params"]:,} | '
            f'{r["macs"]:,} | {r["valid_acc"]:.4f} | {r["accuracy"]:.4f} |'
            for r in result['rows']]
  lines += ['', '![accuracy vs MACs](evaluation.png)']
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------
# The evaluation.
# ---------------------------------------------------------------------------------------


def evaluate(workdir: str, num_random: int,
             config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Evaluates the search of the finished run in ``workdir`` against ``num_random``
  random architectures (see the module docstring); resumes an interrupted evaluation.

  Args:
    workdir: a finished run that searched (``report.json``, ``results/derive.json``,
      its search checkpoint).
    num_random: ``K > 0``, the number of random architectures.
    config: the run's config, only for a run without ``config.json``.

  Returns:
    The ``evaluation.json`` dict: ``metric``, ``num_random``, ``rows`` (one per
    architecture: ``source``, ``arch``, ``op_indices``, ``params``, ``macs``,
    ``valid_acc``, ``accuracy``) and ``summary`` (:func:`summarize`).
  """
  if not isinstance(num_random, int) or num_random <= 0:
    raise ValueError(f'--num_random must be a positive integer, got {num_random!r}')
  config = load_run_config(workdir, config)
  _check_finished(workdir)
  ctx, nets = pipeline.setup(config, workdir)
  metric = nets.task.headline(config, nets.splits)
  baseline = nets.space.baseline()
  refined = nets.space.validate(_read_json(os.path.join(workdir, 'arch.json'))['op_indices'])
  randoms = random_architectures(ctx, nets, num_random, (baseline, refined))
  sources = (['baseline', 'refined'] + [f'random_{i:02d}' for i in range(num_random)])
  archs = [baseline, refined] + randoms
  valid = shared_scores(ctx, nets, archs)
  retrained = [_retrained(ctx, nets, 'baseline', baseline) if baseline != refined
               else _retrained(ctx, nets, 'refined', refined), _retrained(ctx, nets, 'refined', refined)]
  retrained += retrain_random(ctx, nets, randoms)
  rows = []
  for source, arch, valid_acc, result in zip(sources, archs, valid, retrained):
    counts = nets.counts(arch)
    rows.append({'source': source, 'arch': nets.space.names(arch), 'op_indices': list(arch),
                 'params': counts.params, 'macs': counts.macs, 'valid_acc': valid_acc,
                 'accuracy': nets.task.headline_value(config, result)})
  result = {'dataset': config.dataset.name, 'space': nets.space.name, 'metric': metric,
            'num_random': num_random, 'rows': rows, 'summary': summarize(rows)}
  directory = os.path.join(workdir, EVALUATION_DIR)
  if distributed.is_main_process():
    files.write_json(os.path.join(directory, 'evaluation.json'), result)
    with open(os.path.join(directory, 'evaluation.md'), 'w') as f:
      f.write(markdown(result, nets.family))
    plot(rows, metric, os.path.join(directory, 'evaluation.png'))
  ctx.log.info(f'[evaluate] report: {os.path.join(directory, "evaluation.md")}')
  return result


def main(argv: Sequence[str]) -> None:
  """absl entry point: evaluates ``--workdir`` and prints the summary."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  train.add_cpu_xla_flags()
  try:
    distributed.initialize_from_flags()
    # One run per workdir at a time: process 0 holds the lock for all (a busy workdir
    # stops every process).
    with contextlib.ExitStack() as held:
      distributed.main_process_first(
          lambda: held.enter_context(workdir_lib.lock(flags.FLAGS.workdir)))
      result = evaluate(flags.FLAGS.workdir, flags.FLAGS.num_random, flags.FLAGS.config)
  except (DatasetNotPreparedError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  if not distributed.is_main_process():
    return
  s = result['summary']
  k = s['kendall']
  print(f'Kendall tau {_fmt(k["tau"], ".3f")} (p {_fmt(k["p_value"], ".3g")}, '
        f'{k["num_architectures"]} architectures)')
  print(f'refined {result["metric"]} {s["refined_accuracy"]:.4f}: percentile among the random '
        f'{_group_text(s["random"])}; among those with at most its MACs '
        f'{_group_text(s["random_at_most_refined_macs"])}')


if __name__ == '__main__':
  # Defined here, not at import: nar_jax.main defines its own --config and --workdir.
  config_flags.DEFINE_config_file('config', None, "The run's config file, only for a run "
                                  'without config.json (overrides as in nar_jax.main).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'A finished run (nar_jax.main --workdir).')
  flags.DEFINE_integer('num_random', None, 'How many random architectures to retrain.')
  flags.mark_flags_as_required(['workdir', 'num_random'])
  distributed.define_flags()
  app.run(main)
