"""The paper's Table 1: does a jointly searched architecture (NAS-Arch) transfer?

Retrains NAS-Arch (the ``arch.json`` of a ``configs/cifar_nasarch.py`` run, or a joint
architecture given as JSON) and ResNet-20 with 64/128/256 channels with one recipe on
task A and task B, and writes ``transfer.md`` / ``transfer.json`` (``nar_jax/transfer.py``).

* none: A = CIFAR-10 (test accuracy), B = faces_emore: both networks trained as face
  networks (ArcFace "E" embedding + margin head on every identity) and verified on
  LFW, CFP-FP and AgeDB-30, as the paper. Set ``--config.tasks.B.data_dir`` (the
  insightface directory with train.rec and the three .bin files).
* ``smoke``: A = mnist5k, B = synthetic faces (32x32) trained with an additive angular
  margin (s=16, m=0.2, gentler than ArcFace's 64 / 0.5 for 24 steps) and verified on
  ``synthetic.bin`` (200 pairs of identities unseen in training); narrow networks, two
  epochs each: offline, minutes on a CPU. NAS-Arch defaults to a fixed 6-layer joint
  architecture so the smoke study needs no search.

``--config.face_head=False`` classifies task B's proxy identities with softmax heads
instead of verifying.

  launch/transfer_study.sh runs/transfer            # search NAS-Arch, then the study
  python -m nar_jax.transfer --config=configs/transfer_study.py:smoke --workdir=runs/transfer_smoke
"""

import json

from nar_jax.config import sgd_config
from nar_jax.transfer import study_config

# A 6-layer ENAS macro architecture with skips (readable form), for the smoke study.
SMOKE_NAS_ARCH = [
    {'op': 'sep3x3', 'skips': []},
    {'op': 'conv5x5', 'skips': ['stem']},
    {'op': 'max3x3', 'skips': ['layer0']},
    {'op': 'conv3x3', 'skips': ['stem', 'layer1']},
    {'op': 'sep5x5', 'skips': ['layer2']},
    {'op': 'avg3x3', 'skips': ['layer0', 'layer3']},
]


def get_config(arg=None):
  c = study_config()
  # Task A: CIFAR-10 (ENAS's 45k/5k split; retraining uses train + valid).
  c.tasks.A.name = 'cifar10'
  # Task B: faces_emore with ArcFace (every identity), verified on the paper's pair sets.
  c.tasks.B.name = 'faces'
  c.tasks.B.verification = 'lfw,cfp_fp,agedb_30'
  c.tasks.B.crop_padding = 0
  c.tasks.B.flip = True
  # One recipe for every (network, task): SGD Nesterov, cosine 0.1 -> 0, 200 epochs.
  c.retrain.epochs = 200
  c.retrain.batch_size = 128
  c.retrain.optimizer = sgd_config(lr_max=0.1, lr_min=0.0, t0_epochs=200, t_mul=1,
                                   weight_decay=5e-4)
  if arg == 'smoke':
    c.nas_arch = json.dumps(SMOKE_NAS_ARCH)
    c.nas_arch_channels = 8
    c.resnet_width = 0.125            # 8-16-32 channels
    c.tasks.A.name = 'mnist5k'
    c.tasks.A.crop_padding = 2
    c.tasks.A.flip = False
    c.tasks.B.name = 'synthetic_faces'
    c.tasks.B.verification = 'synthetic'
    c.embedding_size = 64
    # A gentler margin than ArcFace's (64, 0.5) for 24 training steps from scratch.
    c.margin.update(scale=16.0, m2=0.2)
    c.tasks.B.synthetic.update(num_identities=16, images_per_identity=24, image_size=32,
                               num_pairs=200, verification_identities=4)
    c.tasks.B.proxy.update(num_identities=16, images_per_identity=24, valid_per_identity=4)
    c.retrain.epochs = 2
    c.retrain.batch_size = 32
    c.retrain.optimizer.lr_max = 0.05
    c.retrain.optimizer.t0_epochs = 2
    c.eval_batch_size = 100
    c.log_every_steps = 20
  elif arg not in (None, ''):
    raise ValueError(f"unknown variant {arg!r}; use 'smoke' or none")
  return c
