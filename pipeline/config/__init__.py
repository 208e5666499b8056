"""Configuration: the schema of every option (`schema`) and the params file that fills it (`params`)."""
from .params import PARAMS, REPORTS, RESULTS, data_dir, load_params, profile_datasets
from .schema import (
                     IMG_SIZE_RULE,
                     MAX_SHOWN,
                     AugmentConfig,
                     BenchmarkConfig,
                     BuiltinDataConfig,
                     ConfigError,
                     HeadConfig,
                     MlflowConfig,
                     Params,
                     PrepareConfig,
                     ProfileConfig,
                     RayConfig,
                     RecipeConfig,
                     TableConfig,
                     TableRow,
                     TrainConfig,
                     TrialConfig,
                     check_name,
                     flatten,
                     parse,
                     parse_head,
                     parse_head_spec,
                     to_dict,
                     valid_img_size,
)

__all__ = ["PARAMS", "REPORTS", "RESULTS", "data_dir", "load_params", "profile_datasets", "IMG_SIZE_RULE",
           "MAX_SHOWN", "AugmentConfig", "BenchmarkConfig", "BuiltinDataConfig", "ConfigError", "HeadConfig",
           "MlflowConfig", "Params", "PrepareConfig", "ProfileConfig", "RayConfig", "RecipeConfig", "TableConfig",
           "TableRow", "TrainConfig", "TrialConfig", "check_name", "flatten", "parse", "parse_head", "parse_head_spec",
           "to_dict", "valid_img_size"]
