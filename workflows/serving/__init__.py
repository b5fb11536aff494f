"""Online segmentation: the Ray Serve application of `mrcnn-serve`."""
