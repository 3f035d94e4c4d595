"""The self-supervised objectives beside Barlow Twins (train/loss.py), one file each, written as their papers define
them, all over the global batch with autograd-aware collectives (train/losses/collectives.py).

Every loss follows train/loss.py's convention under torch.distributed: each rank returns the same global loss L, and
the gradient reaching a rank's own rows is world_size * dL/dz_local, which DDP's gradient average turns into the
single-process gradient on the whole global batch. Call backward on the loss as it is.
"""

from twinray.train.losses.byol import byol_loss, byol_momentum
from twinray.train.losses.moco import info_nce_loss
from twinray.train.losses.simclr import nt_xent_loss
from twinray.train.losses.vicreg import vicreg_loss

__all__ = ["byol_loss", "byol_momentum", "info_nce_loss", "nt_xent_loss", "vicreg_loss"]
