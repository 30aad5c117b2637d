"""Constants every stage shares: one definition each."""

# ImageNet RGB mean / std of pixels in [0, 1] (torchvision's); models normalise inside, datasets
# yield [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The 20 PASCAL VOC classes in the devkit's order (label k + 1 of a detector; 0 is background).
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
               "sofa", "train", "tvmonitor")
