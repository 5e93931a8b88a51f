"""The IIC method on batched clip tensors: views, intra-negatives, memory banks and the loss,
with their multi-process forms (one rank's share of a global-batch draw, banks kept identical).

Every function takes float tensors B x 3 x T x H x W in [0, 1] on the training device (spec 3.3,
6, 7); nothing here reads files or knows about training loops.
"""
