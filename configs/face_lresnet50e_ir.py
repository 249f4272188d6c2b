"""Faces: refine ArcFace's LResNet50E-IR (paper section 4.1, Table 4).

Variants (``--config=configs/face_lresnet50e_ir.py:<variant>``):

* none: the whole paper pipeline on faces_emore: search on the proxy task (4,000
  identities x 40 images, 36 train / 4 valid each), then retrain the refined and the
  baseline IR-50 on every identity with ArcFace's recipe, and verify both on LFW,
  CFP-FP and AgeDB-30.
* ``proxy``: the search on the proxy task only (the paper's search recipe: SGDR with
  T0 = 10, T_mult = 2, lr 0.1 -> 1e-4, 150 epochs); retraining is left to a later run
  with ``--config.arch=<the refined ops>``.
* ``pretrain``: as none, with 10 epochs of uniformly random architectures first
  (the paper's LResNet50E-IR-RP).
* ``smoke``: synthetic faces written as genuine ``train.rec``/``.idx``/``property`` and
  ``.bin`` files, a tiny IR-18, the whole pipeline offline on CPU in a few minutes.

Point ``--config.dataset.data_dir`` at the insightface directory (``train.rec``,
``train.idx``, ``property``, ``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``).

  python -m nar_jax.main --config=configs/face_lresnet50e_ir.py \
      --config.dataset.data_dir=/data/faces_emore --workdir=runs/ir50
"""

from nar_jax.config import base_config, sgd_config


def get_config(arg=None):
  c = base_config()
  c.dataset.name = 'faces'
  c.dataset.crop_padding = 0          # ArcFace augments with horizontal flips only
  c.dataset.flip = True
  c.dataset.verification = 'lfw,cfp_fp,agedb_30'
  c.model.base = 'ir50'
  c.model.dtype = 'bfloat16'          # fp32 parameters and optimizer state
  c.margin.scale, c.margin.m1, c.margin.m2, c.margin.m3 = 64.0, 1.0, 0.5, 0.0  # ArcFace

  # Search on the proxy task (paper section 4.1.1).
  c.child.batch_size = 256
  c.child.optimizer = sgd_config(lr_max=0.1, lr_min=1e-4, t0_epochs=10, t_mul=2,
                                 weight_decay=5e-4, nesterov=False)
  c.search.epochs = 150
  c.search.controller.valid_batch_size = 256
  # README, "Controller variants": fastest on a planted per-node target at 20 per update.
  c.search.controller.kind = 'node_aware'
  c.search.controller.lr = 0.01
  c.search.controller.baseline_decay = 0.9

  # Retraining on every identity: SGD 0.1, momentum 0.9, weight decay 5e-4, batch 512,
  # step decay (x0.1 after epochs 12, 20 and 24 of 26, the schedule public IR-50
  # trainings on MS1M-v2 use; insightface's MXNet script decays at 100k/160k/220k
  # iterations, about 9/14/19 epochs of faces_emore at batch 512).
  c.retrain.data = 'full'
  c.retrain.epochs = 26
  c.retrain.batch_size = 512
  c.retrain.optimizer = sgd_config(lr_max=0.1, lr_min=0.0, t0_epochs=0, t_mul=1,
                                   weight_decay=5e-4, nesterov=False, schedule='step',
                                   decay_epochs='12,20,24')
  c.retrain.verify_every_epochs = 2
  c.eval_batch_size = 512

  if arg == 'proxy':
    c.retrain.epochs = 0
    c.retrain.baseline = False
  elif arg == 'pretrain':
    c.pretrain.epochs = 10
  elif arg == 'smoke':
    c.dataset.name = 'synthetic_faces'
    c.dataset.verification = 'synthetic'
    c.dataset.synthetic.update(num_identities=24, images_per_identity=16, image_size=32,
                               num_pairs=200, verification_identities=10)
    c.dataset.proxy.update(num_identities=16, images_per_identity=12, valid_per_identity=2)
    c.model.base = 'ir18'
    c.model.width = 0.0625            # 4-8-16-32 channels
    c.model.dtype = 'float32'
    c.margin.scale = 16.0             # s = 64 is tuned for 512-d features of 85k identities
    c.child.batch_size = 32
    c.child.optimizer.t0_epochs = 4
    c.search.epochs = 2
    c.search.controller.updates_per_epoch = 4
    c.search.controller.num_aggregate = 4
    c.search.controller.valid_batch_size = 32
    c.derive.num_samples = 2
    c.retrain.data = 'full'
    c.retrain.epochs = 2
    c.retrain.batch_size = 32
    c.retrain.optimizer.decay_epochs = '1'
    c.retrain.verify_every_epochs = 0
    c.eval_batch_size = 100
    c.log_every_steps = 5
  elif arg not in (None, ''):
    raise ValueError(f"unknown variant {arg!r}; use 'proxy', 'pretrain' or 'smoke'")
  return c
