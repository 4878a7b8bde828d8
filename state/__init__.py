"""loopline.state"""
