"""The paper's Table 6: a ResNet-18 refined on CIFAR-10, transferred to ImageNet-1k.

The refined architecture (the ``arch.json`` of a ``configs/cifar_resnet18.py`` run,
ResNet-18-16, or of ``configs/cifar_resnet18_block.py`` with
``--config.model.granularity=block``, ResNet-18-8) and the baseline are retrained as
ImageNet ResNet-18s (7x7 stride-2 stem, 3x3 stride-2 max pool, the searched op at each
node; baseline 11,689,512 parameters and 1,814,073,344 MACs at 224x224) with the standard
recipe, and reported with top-1 and top-5 on the 50,000 validation images next to their
parameters and MACs:

* 90 epochs, batch 256, SGD momentum 0.9 (no Nesterov), weight decay 1e-4;
* learning rate 0.1 per 256 images, a linear warm-up over the first 5 epochs, then step
  decay x0.1 at epochs 30, 60 and 80 (Goyal et al., 2017); with another batch size B
  also set ``--config.retrain.optimizer.lr_max=<0.1 * B / 256>``;
* train: random-resized crop (8%-100% of the area, aspect 3/4-4/3) to 224 and a random
  flip, on the host (grain); evaluation: shorter side 256, central 224 crop.

Variants:

  configs/imagenet_resnet18.py            the refined network and the baseline (give
                                          --config.arch=<CIFAR-10 run>/arch.json)
  configs/imagenet_resnet18.py:baseline   the baseline alone
  configs/imagenet_resnet18.py:smoke      32x32 crops of a width-0.125 network, one epoch
                                          of batch 8 (tests, on a fake imagenet2012)

ImageNet must be prepared once (README, "Preparing ImageNet"):

  python -m nar_jax.main --config=configs/imagenet_resnet18.py \
      --config.arch=runs/cifar_resnet18/arch.json \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --workdir=runs/imagenet_resnet18
"""

import ml_collections

from nar_jax.config import base_config, sgd_config


def get_config(arg=None):
  if arg not in (None, '', 'baseline', 'smoke'):
    raise ValueError(f"unknown variant {arg!r}; use 'baseline', 'smoke' or none")
  c = base_config()
  c.dataset.name = 'imagenet2012'
  c.dataset.crop_padding = 0         # cropped and flipped on the host (grain)
  c.dataset.flip = False
  c.dataset.image_size = 224         # the side of the train and eval crops
  # Decoding on each host (nar_jax.data.imagenet.InputOptions; README, "Preparing
  # ImageNet" for the throughput they give).
  c.dataset.input = ml_collections.ConfigDict(dict(threads=16, processes=0, buffer=512))
  c.model.base = 'resnet18'
  c.model.granularity = 'conv'       # ResNet-18-16; 'block' for ResNet-18-8 arch.json files
  c.model.stem = 'imagenet'          # 7x7/2 conv + 3x3/2 max pool
  c.retrain.epochs = 90
  c.retrain.batch_size = 256
  c.retrain.optimizer = sgd_config(lr_max=0.1, lr_min=0.0, t0_epochs=90, t_mul=1,
                                   weight_decay=1e-4, momentum=0.9, nesterov=False,
                                   schedule='step', decay_epochs='30,60,80', decay_factor=0.1)
  c.retrain.optimizer.warmup_epochs = 5.0
  c.retrain.baseline = True          # retrain the baseline beside the refined network
  c.eval_batch_size = 400            # 50,000 = 125 x 400; divisible by 8 and 16 devices
  c.log_every_steps = 100
  c.scan_epoch = False
  if arg == 'baseline':
    c.arch = 'baseline'
  elif arg == 'smoke':
    c.dataset.image_size = 32
    c.dataset.input.update(threads=2, buffer=16)
    c.model.width = 0.125            # 8-16-32-64 channels
    c.retrain.epochs = 1
    c.retrain.batch_size = 8
    c.retrain.optimizer.lr_max = 0.1 * 8 / 256
    c.retrain.optimizer.decay_epochs = ''
    c.retrain.optimizer.warmup_epochs = 0.5
    c.eval_batch_size = 8
    c.log_every_steps = 1
  return c
