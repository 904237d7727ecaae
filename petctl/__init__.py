"""petctl: train and run the AutoPET-II whole-body PET/CT lesion segmentation method.

The package is split into thin CLI verbs (`petctl.commands`) and their typed Python twins
(`petctl.engine`). Importing the package is cheap: nothing heavy (torch, monai, zarr) is imported
until a verb needs it.
"""

__version__ = "0.1.0"
