"""loopline.ops"""
