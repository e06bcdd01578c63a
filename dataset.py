"""The Dataset of Carvana photos and masks at the training size: read the photo, read the mask,
shrink both, augment; a file that fails to decode is named and replaced by the next."""
import sys

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from classes import class_shares
from image_files import load_image, read_mask, shrink_mask


def train_transform(crop=None):
    """Augmentations of (image, mask) pairs already at the training size: the changes real car
    photos show (position, size and a slight tilt of the car; left-right mirror; paint colour and
    light), never an upside-down car. Reflected borders instead of black corners, and car shares
    interpolated linearly so the targets stay soft. Chosen on real photos: docs/training.md.
    crop: (height, width) of a random crop taken first, or None for the whole image."""
    return A.Compose([
        *([A.RandomCrop(*crop)] if crop else []),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.0625, 0.0625), rotate=(-10, 10),
                 border_mode=cv2.BORDER_REFLECT_101, mask_interpolation=cv2.INTER_LINEAR, p=0.7),
        A.HorizontalFlip(p=0.5),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.Normalize(mean=0.0, std=1.0, max_pixel_value=255.0),
    ])


def val_transform():
    return A.Compose([A.Normalize(mean=0.0, std=1.0, max_pixel_value=255.0)])


def to_tensor(image):
    """HWC float image -> CHW float tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def load_training_pair(sample, size, reduced=True, classes=None):
    """(RGB uint8 photo, uint8 0..255 car share) of a sample at size (height, width), or with
    `classes` (classes.Classes) each class's share, (height, width, classes); `reduced`: JPEGs
    decoded at a reduced size (image_files.load_image)."""
    image = load_image(sample.image, size, (sample.width, sample.height), reduced)
    if classes is not None:
        return image, class_shares(classes.read(sample.mask), size, len(classes))
    return image, shrink_mask(read_mask(sample.mask), size)


class CarvanaDataset(Dataset):
    """Image/mask pairs at size (height, width), then through a transform: (image tensor in [0,1],
    mask tensor of car shares in [0,1], 1 x height x width; with `classes`, each class's share,
    classes x height x width). A ResizedCache (cache.py) skips the decoding. A file that fails to
    decode is named once and replaced by the next sample, so a bad file found mid-epoch never
    stops training."""

    def __init__(self, samples, transform, size, cache=None, reduced_decoding=True, classes=None):
        self.samples = list(samples)
        self.transform = transform
        self.size = tuple(size)
        self.cache = cache
        self.reduced_decoding = reduced_decoding
        self.classes = classes
        self.failed = set()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        """key: an index, or (index, seed) to draw this item's augmentation from its own seed."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load_decodable(index)
        if seed is not None:
            self.transform.set_random_seed(seed)
        out = self.transform(image=image, mask=mask)
        shares = torch.from_numpy(out["mask"]).float().div_(255)
        return to_tensor(out["image"]), shares.unsqueeze(0) if shares.dim() == 2 else shares.permute(2, 0, 1)

    def load(self, index):
        """(photo, car share) at the dataset's size: from the cache, or read from the files."""
        if self.cache is not None:
            return self.cache.get(self.samples[index])
        return load_training_pair(self.samples[index], self.size, self.reduced_decoding, self.classes)

    def load_decodable(self, index):
        """load(index), or where that file fails, the next sample that loads."""
        for attempt in range(len(self.samples)):
            current = (index + attempt) % len(self.samples)
            if current in self.failed:
                continue
            try:
                return self.load(current)
            except (OSError, ValueError, cv2.error) as error:
                self.failed.add(current)
                print(f"warning: skipping {error}", file=sys.stderr)
        raise RuntimeError("no sample in this dataset can be decoded")


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of an epoch's shuffled order, each index paired with the seed of its
    augmentation. Both derive from (SEED, epoch) alone, so a resumed run repeats exactly what the
    uninterrupted run would have drawn, with or without loader workers."""

    def __init__(self, dataset, seed, rank=0, world_size=1):
        # drop_last under torchrun: no sample is padded in twice, so the processes' shares never overlap.
        self.order = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed, drop_last=world_size > 1)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        seeds = np.random.SeedSequence([self.seed, self.epoch]).generate_state(len(self.order.dataset))
        return ((index, int(seeds[index])) for index in self.order)
