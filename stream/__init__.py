"""loopline.stream"""
