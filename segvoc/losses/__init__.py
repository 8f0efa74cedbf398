"""Training losses (``segmentation``) and the class weights they can take from the training masks (``weighting``)."""
