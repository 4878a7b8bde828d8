"""loopline.model"""
