"""loopline.kernels"""
