"""reparam.operator"""
