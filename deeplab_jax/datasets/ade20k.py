"""ADE20K scene parsing (MIT SceneParsing challenge 2016, 150 classes) as a TFDS builder (manual download).

Manual directory contents: `ADEChallengeData2016.zip` or its extracted `ADEChallengeData2016/` folder
(images/{training,validation}/*.jpg, annotations/{training,validation}/*.png).
Splits 'train' (20210) and 'val' (2000). Labels are stored as published, as in the official DeepLab
(num_classes=151, ignore_label=0): 0 is "other" (never scored) and 1..150 are the classes, so official
ADE20K checkpoints (151 logits) apply unchanged. Set config.dataset.ignore_label = 0 for this dataset.
"""
from deeplab_jax.datasets import archives
from deeplab_jax.datasets import common

URL = 'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'
ARCHIVE = 'ADEChallengeData2016.zip'
FOLDER = 'ADEChallengeData2016'
SPLIT_SIZES = {'train': 20210, 'val': 2000}
_SPLIT_FOLDERS = {'train': 'training', 'val': 'validation'}
IGNORE_LABEL = 0
CLASS_NAMES = (
    'other', 'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence',
    'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column',
    'signboard', 'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator',
    'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway',
    'river', 'bridge', 'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier', 'awning',
    'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel', 'pole', 'land',
    'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name',
    'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood',
    'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag')


class Ade20k(common.SegmentationBuilder, skip_registration=True):
  """ADE20K (SceneParsing 2016): 150 classes + "other" (0, ignored)."""

  name = 'ade20k'
  CLASS_NAMES = CLASS_NAMES
  HOMEPAGE = 'http://sceneparsing.csail.mit.edu/'
  SPLIT_SIZES = SPLIT_SIZES
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Put {ARCHIVE} from {URL} (or its extracted {FOLDER}/) in the manual dir.'

  @property
  def ignore_label(self) -> int:
    return IGNORE_LABEL

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from the manual directory.
    manual = self.manual_path()
    tree = archives.open_tree(manual, ARCHIVE, FOLDER, FOLDER + '/')
    if tree is None:
      raise common.ManualDownloadError(common.describe_missing(
          self.name, manual, [(f'{manual}/{ARCHIVE}', f'the extracted folder {manual}/{FOLDER}/', URL)]))
    files = tree.files()
    splits = {}
    for split, size in self.SPLIT_SIZES.items():
      folder = _SPLIT_FOLDERS[split]
      prefix = f'images/{folder}/'
      stems = sorted(p[len(prefix):-len('.jpg')] for p in files if p.startswith(prefix) and p.endswith('.jpg'))
      common.check_split_complete(self.name, split, stems, size, f'under {tree.location(prefix)}', tree,
                                  lambda stem: f'annotations/{folder}/{stem}.png',  # pylint: disable=cell-var-from-loop
                                  'annotations', f'get {ARCHIVE} again from {URL}.')
      splits[split] = self._generate_examples(tree, folder, stems)
    return splits

  def _generate_examples(self, tree, folder, stems):
    for stem in stems:
      pair = self._read_pair(tree, f'images/{folder}/{stem}.jpg', tree, f'annotations/{folder}/{stem}.png',
                             num_classes=len(CLASS_NAMES), ignore_label=IGNORE_LABEL)
      if pair is not None:
        yield stem, self.make_example(*pair, stem)
