# find_package(lfads_fast_realtime CONFIG) -> target lfads_fast::realtime
include("${CMAKE_CURRENT_LIST_DIR}/lfads_fast_realtime-targets.cmake")
