# Finds the dependencies of moe::moe; used by the build and by the installed package config.
include(CMakeFindDependencyMacro)
include(GNUInstallDirs)
find_dependency(Eigen3 3.4 NO_MODULE)
find_dependency(xsimd 8)
find_dependency(nlohmann_json 3)
find_dependency(Threads)
# Debian's xsimd 8.1 export names a link dependency `xtl` that is not installed (xsimd needs it only
# for optional xtl interop): drop it when no such target exists.
if(TARGET xsimd AND NOT TARGET xtl)
  set_property(TARGET xsimd PROPERTY INTERFACE_LINK_LIBRARIES "")
endif()
