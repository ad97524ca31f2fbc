"""Flax model families: one module per family (MNIST CGN, discriminators, VGG16, U2-Net, BigGAN, classifiers)."""
